"""Fine-tuning editors on the triplets u2s writes, on Ray Train: the loop run → filter → train → next run.

1. **run**: ``u2s run`` writes a safe table (edited images) and a sensitive table (public caption, edit
   instruction, source of each original).
2. **filter**: :func:`u2s.finetune.data.build_pairs` joins one or more runs' tables by ``id`` into
   (original, edited, instruction, public caption) pairs, keeps ``status: edited`` rows whose CLIP ratio
   (edited vs original image-text score) passes the threshold, and splits train/val by id hash.
3. **train**: :func:`u2s.finetune.trainer.finetune` runs a Ray Train ``TorchTrainer`` over the pairs
   (``u2s finetune --config FILE``), checkpointing EMA weights, optimizer state and the step to
   ``storage_path`` (local or s3://); a restarted worker resumes from the latest checkpoint.
4. **next run**: the final checkpoint folder is what the editor loads
   (``--set stage2.safe_attention.weights=<checkpoint>``, ``stage2.instruct_pix2pix.lora=...`` or
   ``stage2.instruct_pix2pix.unet=...``); the run's ``_run.json`` records it with its fingerprint.
"""
