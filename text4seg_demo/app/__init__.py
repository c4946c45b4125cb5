"""The Gradio web demo."""
