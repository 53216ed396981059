"""kohya / LyCORIS single files (placeholder until the reader lands)."""
