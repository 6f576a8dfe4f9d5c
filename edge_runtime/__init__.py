"""Device runtime: verify and activate releases, serve inference, learn locally, send updates."""
