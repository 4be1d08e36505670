"""Both models run block by block over calibration text; their features become additive cross
statistics (cached, all-reducible)."""
