"""The Gradio demo, built over a serving backend."""
