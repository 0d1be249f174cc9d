"""Inserting the recorder's batches: COPY on PostgreSQL, one executemany elsewhere.

On PostgreSQL an executemany of a few hundred rows still sends each row as a bound
statement; COPY streams them as one command, which is what let the recorder reach its
target there (bench/recorder_throughput.py). Values go through the same SQLAlchemy bind
processors and psycopg adapters as an INSERT would use, so a row reads back the same
either way, and a driver error comes out as SQLAlchemy's (an IntegrityError stays one).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table, insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session


def insert_rows(session: Session, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert `rows`, which all name the same columns, in the session's transaction."""
    if not rows:
        return
    connection = session.connection()
    dialect = connection.dialect
    if dialect.name != "postgresql":
        session.execute(insert(table), rows)
        return
    import psycopg

    names = list(rows[0])
    processors = [table.c[name].type._cached_bind_processor(dialect) for name in names]
    quote = dialect.identifier_preparer.quote
    statement = f"COPY {quote(table.name)} ({', '.join(map(quote, names))}) FROM STDIN"
    raw = connection.connection.dbapi_connection
    try:
        with raw.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row(
                    [
                        row[name] if process is None else process(row[name])
                        for name, process in zip(names, processors, strict=True)
                    ]
                )
    except psycopg.Error as exc:
        raise DBAPIError.instance(statement, None, exc, psycopg.Error, dialect=dialect) from exc
