#!/usr/bin/env python3
"""Developer bootstrap: the README's two quick-start commands.

    python3 dev.py run    set up .venv, migrate the SQLite outbox under ./data, run the relay
    python3 dev.py test   set up .venv, run ruff, mypy (strict on relay/), the import contracts
                          (lint-imports) and every test
    python3 dev.py demo   set up .venv, run `aircall-relay demo` (relay, fake Segment, sample call)

Only the standard library is used here, so this works on a machine that has nothing but
Python 3.11. The virtual environment is rebuilt when pyproject.toml changes (a stamp file
records the hash of the file it was built from). Any further arguments are passed on:
`python3 dev.py test -k receiver` runs a subset, `python3 dev.py run --port 9000` picks a port.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".installed-from"
DEV_ENV_FILE = ROOT / ".relay-dev.env"


def _bin(name: str) -> str:
    return str(VENV / ("Scripts" if os.name == "nt" else "bin") / name)


def ensure_venv() -> None:
    # Run by whatever python3 the machine has, so the check is real.
    if sys.version_info < (3, 11):  # noqa: UP036
        sys.exit(f"dev.py: Python 3.11 or newer is needed, this is {sys.version.split()[0]}")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == wanted and Path(_bin("python")).exists():
        return
    print("dev.py: setting up .venv (first run, or pyproject.toml changed) ...", flush=True)
    if not Path(_bin("python")).exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    pip = [_bin("python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "install", "-e", f"{ROOT}[test]"], check=True)
    STAMP.write_text(wanted + "\n")


def dev_environment() -> dict[str, str]:
    """The environment for a local run: a generated Aircall token kept in a private file.

    The token is never printed: the file is readable only by its owner, and the message says
    how to use it without showing it.
    """
    env = dict(os.environ)
    if "RELAY_AIRCALL_TOKENS" in env:
        return env
    if not DEV_ENV_FILE.exists():
        token = secrets.token_hex(16)
        DEV_ENV_FILE.write_text(f"RELAY_AIRCALL_TOKENS=local:{token}\n")
        DEV_ENV_FILE.chmod(stat.S_IRUSR | stat.S_IWUSR)
    for line in DEV_ENV_FILE.read_text().splitlines():
        name, _, value = line.partition("=")
        if name.strip() and not name.startswith("#"):
            env.setdefault(name.strip(), value.strip())
    return env


def _call(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> int:
    """Run `command` and return its exit code. Ctrl-C reaches the child too (same process
    group), which stops by itself (gracefully, or at once on a second Ctrl-C): wait for it
    rather than die with a traceback while it is still stopping."""
    with subprocess.Popen(command, cwd=cwd, env=env) as child:
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:
                continue


def run(args: list[str]) -> int:
    ensure_venv()
    env = dev_environment()
    relay = _bin("aircall-relay")
    subprocess.run([relay, "migrate"], check=True, env=env, cwd=ROOT)
    print(
        "dev.py: the Aircall token for this local relay is in .relay-dev.env "
        '(RELAY_AIRCALL_TOKENS=local:<token>); put it in the body\'s "token" field.',
        flush=True,
    )
    return _call([relay, "run", *args], env=env, cwd=ROOT)


def demo(args: list[str]) -> int:
    ensure_venv()
    return _call([_bin("aircall-relay"), "demo", *args], cwd=ROOT)


def test(args: list[str]) -> int:
    ensure_venv()
    sources = [
        name
        for name in ("relay", "tests", "migrations", "bench", "dev.py")
        if (ROOT / name).exists()
    ]
    steps = [
        [_bin("ruff"), "check", *sources],
        [_bin("ruff"), "format", "--check", *sources],
        [_bin("mypy")],
        # The import contracts ([tool.importlinter] in pyproject.toml): dependencies point down.
        [_bin("lint-imports"), "--no-logo", "--no-cache"],
        [_bin("python"), "-m", "pytest", *args],
    ]
    for step in steps:
        print(
            "dev.py: $",
            " ".join(Path(step[0]).name if i == 0 else a for i, a in enumerate(step)),
            flush=True,
        )
        code = _call(step, cwd=ROOT)
        if code != 0:
            return code
    return 0


def main() -> int:
    commands = {"run": run, "test": test, "demo": demo}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(__doc__)
        return 2
    return commands[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
