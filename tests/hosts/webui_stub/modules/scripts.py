"""Stand-in for the webui's modules/scripts.py: the Script contract, argument slicing, hook order and
catch-and-log, as recorded in tests/hosts/webui_facts.json (Forge dfdcbab6, A1111 1.10 semantics)."""

import traceback

AlwaysVisible = object()
HOST = "forge"  # "forge": PostprocessImageArgs(image, index); "a1111": PostprocessImageArgs(image)
errors: list[str] = []  # what the host would log through errors.report


class PostprocessImageArgs:
    def __init__(self, image, index):
        self.image = image
        self.index = index


class A1111PostprocessImageArgs:  # A1111 and SD.Next: no index
    def __init__(self, image):
        self.image = image


class Script:
    args_from = None
    args_to = None
    is_txt2img = True
    is_img2img = False

    def title(self):
        raise NotImplementedError

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        pass

    def process(self, p, *args):
        pass

    def postprocess_image(self, p, pp, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def elem_id(self, item_id):
        return f"script_txt2img_{self.title().lower().replace(' ', '_')}_{item_id}"


class ScriptRunner:
    """Holds the always-on scripts; every hook gets ``p.script_args[args_from:args_to]``."""

    def __init__(self, scripts_, ui_values: list[list]):
        self.alwayson_scripts = []
        self.script_args = []
        for script, values in zip(scripts_, ui_values):
            if script.show(False) is not AlwaysVisible:
                continue
            script.args_from = len(self.script_args)
            self.script_args += list(values)
            script.args_to = len(self.script_args)
            self.alwayson_scripts.append(script)

    def _run(self, hook: str, p, *args):
        for script in self.alwayson_scripts:
            try:
                getattr(script, hook)(p, *args, *p.script_args[script.args_from:script.args_to])
            except Exception:
                errors.append(f"Error running {hook}: {script.title()}\n{traceback.format_exc()}")

    def process(self, p):
        self._run("process", p)

    def postprocess_image(self, p, pp):
        self._run("postprocess_image", p, pp)

    def postprocess(self, p, processed):
        self._run("postprocess", p, processed)
