"""The app's file guard: of the dataset folder, Gradio serves images only (no metadata, no captions)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.responses import PlainTextResponse

from ..data.datasets import IMAGE_EXTENSIONS

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send


class DatasetImagesOnly:
    """ASGI middleware: of the dataset folder, only images are served by URL, not metadata.jsonl,
    caption files or anything else kept beside them. Gradio's ``allowed_paths`` takes whole folders,
    and the folder must be allowed for the galleries to show its images.

    Args:
        app: The ASGI app to guard (Gradio's).
        root: The dataset folder.
    """

    FILE_ROUTE = re.compile(r"/file[=/](.*)$")  # Gradio's /gradio_api/file=PATH and /gradio_api/file/PATH

    def __init__(self, app: ASGIApp, root: Path):
        self.app, self.root = app, Path(root).resolve()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            match = self.FILE_ROUTE.search(scope.get("path", ""))
            if match and not self.servable(match[1]):
                return await PlainTextResponse("File not allowed.", status_code=403)(scope, receive, send)
        await self.app(scope, receive, send)

    def servable(self, requested: str) -> bool:
        """Whether a file URL's path may be served: images of the dataset folder yes, its other files no.

        Args:
            requested: The path (or URL) a Gradio file route asks for.

        Returns:
            False for a non-image file in (or resolving into) the dataset folder, or a path that cannot
            be resolved; True otherwise (paths outside the folder are left to Gradio's own rules).
        """
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", requested):
            return True  # a URL, not a file of this machine
        try:
            path = Path(os.path.abspath(requested))
            resolved = path.resolve()
        except (ValueError, RuntimeError, OSError):  # a NUL byte, a symlink loop, a name too long: nothing to serve
            return False
        if not (path.is_relative_to(self.root) or resolved.is_relative_to(self.root)):
            return True  # Gradio's own rules decide
        return all(p.suffix.lower() in IMAGE_EXTENSIONS and p.is_relative_to(self.root) for p in (path, resolved))
