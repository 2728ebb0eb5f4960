"""Alembic environment.

``Database.upgrade`` passes its own connection in ``config.attributes``; the
command-line path (``alembic -c kerjostunt/store/migrations/alembic.ini -x
db=URL ...``) is there for writing new revisions.
"""

from alembic import context
from sqlalchemy import Connection, create_engine
from sqlalchemy.pool import NullPool

from kerjostunt.store.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("db")
    return url or config.get_main_option("sqlalchemy.url") or "sqlite:///kerjostunt.sqlite"


def _run(connection: Connection) -> None:
    # Batch mode lets later revisions ALTER tables on SQLite too.
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations() -> None:
    if context.is_offline_mode():
        context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(_url(), poolclass=NullPool)
    with engine.begin() as connection:
        _run(connection)
    engine.dispose()


run_migrations()
