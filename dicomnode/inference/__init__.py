"""Model inference: series volumes, model cards, runtimes, pre- and postprocessing."""
