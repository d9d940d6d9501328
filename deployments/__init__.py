"""deployments layer of DDA lineage (docs/layers.md)."""
