"""The proxy's persistent state, one module per job. The public surface is :mod:`proxy.store`
(the :class:`~proxy.store.Store` facade and its value types); these modules are its parts.

* :mod:`.schema`: the DDL, the ``schema_version`` table and the ordered migrations run at
  start-up.
* :mod:`.models`: the stored value types (Tenant, ApiKey, Dataset, Job), the errors, and the
  conversion of rows into them.
* :mod:`.codec` / :mod:`.validation`: canonical JSON, ids, key hashes; argument checks.
* :mod:`.tenants`, :mod:`.datasets`, :mod:`.jobs`: one repository per resource;
  :mod:`.files` and :mod:`.batches` for the Batch API (files with their bytes, batches, one
  exactly-once row per answered line).
* :mod:`.ledger`: the append-only hash-chained ledger (row hashing, append, verify).
* :mod:`.admission`: admit a job (charge the filters, append the ledger row, insert the job)
  in one transaction; :mod:`.report`: the budget report.

Storage stores charges; the arithmetic that decides them is :mod:`accountant`'s. Nothing here
imports ``dp_accounting`` (tests/proxy/test_storage_layout.py checks it).
"""

__all__: list[str] = []
