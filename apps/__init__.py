"""The apps over igpt_core: the Gradio completion demo (demo.py) and the Streamlit probe dashboard
(dashboard.py). In the repository they are apps/; installed, they are the package igpt_apps. Each
runs as a script (`igpt demo`, `igpt dashboard`), so importing this package does nothing."""
