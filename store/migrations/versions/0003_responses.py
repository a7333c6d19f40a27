"""The answer each evaluated chain gave, so that answers can be counted and compared.

Revision ID: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    with op.batch_alter_table("evaluations") as table:
        table.add_column(sa.Column("response", sa.String(256), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("evaluations") as table:
        table.drop_column("response")
