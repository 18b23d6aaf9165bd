"""What every part of the pipeline shares: the params schema, the image contract, atomic
file writes, PNG encoding, the CPU's facts, the user-facing error and the stage runner."""
