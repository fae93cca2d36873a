"""Alembic migrations of the control plane's store (run by `Store.open`, never by hand).

To add one: ``alembic -c src/edgewise/cloud/migrations/alembic.ini revision -m "..."`` after
changing `edgewise.cloud.store.models`, then review the generated file (autogenerate misses
some changes) and run the store tests on SQLite and PostgreSQL.
"""
