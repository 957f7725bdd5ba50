"""The end-to-end demo: data the project generates itself, and the pipeline run on it."""
