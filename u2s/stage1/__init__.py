"""Stage 1: inspect (privacy flag), describe (review + dual captions), instruct (edit instruction)."""
