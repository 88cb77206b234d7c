"""Developer tools that (re)build the assets shipped in `humpback_jax/assets/`."""
