"""Stage 2: rewrite flagged images with an instruction-driven editor (`runner.EditStage`)."""
