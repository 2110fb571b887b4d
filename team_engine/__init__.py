"""The team engine: one denoiser for many editors, served by Ray Serve (docs/TEAM_ENGINE.md).

`parafill engine` runs the denoiser as a Ray Serve application: each replica
loads its own model and its own context cache, requests for one document keep
landing on the replica that holds its keys and values, and every request needs
the engine's bearer token. The language server reaches it over HTTP
(`lsp_server/engine_client.py`); nothing else in parafill imports this package.
Only `app.py` and `cluster.py` import Ray; the rest is plain Python.
"""
