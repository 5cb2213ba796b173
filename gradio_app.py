"""das-sd's Gradio app: `python gradio_app.py [--store DIR --base DIR --lora FILE]` (no flags: the demo)."""

from das_sd.app import main

if __name__ == "__main__":
    main()
