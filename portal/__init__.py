"""The customer portal: the billing and usage pages an organization's members use.

Server-rendered pages (Jinja2 through aiohttp-jinja2, autoescaped) served by the billing
service under /portal, reading and changing state only through the doors the API
uses (billing.actions, billing.store, billing.catalog, ledger.store, hotpath.client,
accounts.admin), so a page can never do what the API would refuse. `portal.app.mount`
adds it to the billing application (ops hands it to billing.app.create_app).
"""
