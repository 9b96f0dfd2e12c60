"""The server: routes, admission, storage and migrations, the ledger, jobs, serving, the admin CLI."""
