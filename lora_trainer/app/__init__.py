"""The application shell shared by the WebUI extension and the standalone app: settings, the allowed-roots guard,
the host (who generates images and lists checkpoints), the services object the UI tabs and the HTTP API share.

Floor 5: imports the core freely; the core never imports this. Gradio and FastAPI are imported only by the modules
that build tabs (``app/ui/``) and routes (``app/api.py``), and only when they are called.
"""
