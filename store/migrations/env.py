"""Alembic environment: migrations run on the connection the store opened (engine.py)."""

from alembic import context

from lm_eval_cola.store.engine import VERSION_TABLE
from lm_eval_cola.store.schema import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,
    version_table=VERSION_TABLE,
)
with context.begin_transaction():
    context.run_migrations()
