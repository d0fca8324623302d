"""Running a loaded model: `AuraFlowPipeline` (prompt encoding, the velocity model, sampling, VAE decode, the whole
generation) and the opt-in speed modes."""
