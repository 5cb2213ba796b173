"""Stand-in for modules/script_callbacks.py: registries filled at import time of a script."""

callbacks_ui_tabs: list = []
callbacks_ui_settings: list = []
callbacks_app_started: list = []


def on_ui_tabs(callback, *, name=None):
    callbacks_ui_tabs.append(callback)


def on_ui_settings(callback, *, name=None):
    callbacks_ui_settings.append(callback)


def on_app_started(callback, *, name=None):
    callbacks_app_started.append(callback)
