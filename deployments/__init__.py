"""deployments layer of DDA lineage (DESIGN.md section 3)."""
