"""Sequential recommendation: SASRec with full, scalable and sampled cross-entropy (SCE paper's setting)."""
