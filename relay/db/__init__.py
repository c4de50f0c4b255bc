"""The database package: the only one that imports SQLAlchemy."""

from sqlalchemy.exc import SQLAlchemyError as DatabaseError

__all__ = ["DatabaseError"]
