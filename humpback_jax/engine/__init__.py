"""The continuous generation engine: chunked prefill, shared-prefix reuse and fixed decode slots.

`programs` holds the pure, jitted pieces; `prefix` finds and keeps shared prompt prefixes;
`slots` is the host-side scheduler that `generate.Engine(scheduler="continuous")` drives.
"""
