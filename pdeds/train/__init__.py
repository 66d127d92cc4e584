"""The training job: data stream, engine set-up, level hook, checkpoints, monitor, loop."""
