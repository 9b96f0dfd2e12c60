"""Operator commands: `dpicl tenant create` prints the admin key alone on its last line;
`dpicl ledger verify` recomputes the ledger and exits non-zero when it is tampered with."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from devtools.server import dpicl
from dp_decoding.plan import make_plan
from proxy.store import Store
from tests.fakes import admit_plan


def test_tenant_create_and_ledger_verify(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'l.db'}"
    r = dpicl("tenant", "create", "acme", "--epsilon", "8", "--delta", "1e-6", "--db", db)
    key = r.stdout.strip().splitlines()[-1]
    assert key.startswith("dpicl-") and " " not in key
    assert (
        dpicl("tenant", "create", "acme", "--epsilon", "8", "--db", db, check=False).returncode == 2
    )
    assert (
        dpicl("tenant", "create", "x", "--epsilon", "-1", "--db", db, check=False).returncode == 2
    )

    store = Store.open(db)
    api_key = store.authenticate(key)
    assert api_key is not None and api_key.scope == "admin"
    ds = store.create_dataset(api_key.tenant_id, "d", [{"text": "t", "label": "a"}])
    plan = make_plan(labels=["a"], epsilon=1.0, max_tokens=4)
    admit_plan(store, api_key.tenant_id, plan, name="j", dataset_id=ds.id)
    store.close()
    ok = dpicl("ledger", "verify", "--db", db, check=False)
    assert ok.returncode == 0 and '"ok": true' in ok.stdout

    # tamper with the stored charge behind the application's back (triggers block UPDATE, so
    # drop them first, as an attacker with file access could)
    conn = sqlite3.connect(tmp_path / "l.db")
    triggers = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")]
    for t in triggers:
        conn.execute(f'DROP TRIGGER "{t}"')
    conn.execute("UPDATE ledger SET epsilon = epsilon / 2")  # under-report a charge
    conn.commit()
    conn.close()
    bad = dpicl("ledger", "verify", "--db", db, check=False)
    assert bad.returncode == 1 and '"ok": false' in bad.stdout
