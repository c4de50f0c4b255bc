"""Alembic migrations of the outbox schema (installed as the package `relay_migrations`)."""
