"""Work in token-layer applications: per evaluation, and each document's physical limit.

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    with op.batch_alter_table("evaluations") as table:
        table.add_column(sa.Column("token_layer_applications", sa.Integer(), nullable=True))
    with op.batch_alter_table("run_documents") as table:
        table.add_column(sa.Column("token_layer_limit", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("run_documents") as table:
        table.drop_column("token_layer_limit")
    with op.batch_alter_table("evaluations") as table:
        table.drop_column("token_layer_applications")
