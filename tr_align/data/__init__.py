"""Input pipelines: the built-in synthetic task and the batching/iteration shared by all sources."""
