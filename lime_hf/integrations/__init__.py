"""Integrations that only some users need; the core never imports them. Each needs its extra, e.g.
`pip install "lime_hf[datatrove]"` for `lime_hf.integrations.datatrove`."""
