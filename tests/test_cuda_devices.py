"""A run on cuda:N does everything on device N: every CUDA call that would otherwise take the current device
(device 0 unless set) names its device or stream, or runs where the run's device is made current.

Read from the source, since no GPU is here to run it: a call that falls back to the current device is one
that can fail this test, before a copy overwrites a slot that queued compute on another device still reads.
"""

import ast
from pathlib import Path

import promoe_bench

# torch.cuda functions that act on the current device unless given one
DEVICE_DEFAULTING = {"current_stream", "Stream", "synchronize", "reset_peak_memory_stats", "max_memory_allocated",
                     "max_memory_reserved", "memory_allocated", "memory_reserved", "mem_get_info",
                     "get_device_properties", "empty_cache"}
DEVICE_SCOPES = ("torch.cuda.device", "on_device")  # `with` blocks that make the run's device current


class Finder(ast.NodeVisitor):
    def __init__(self):
        self.scoped = 0  # inside a `with` that makes a device current
        self.found: list[tuple[int, str]] = []

    def visit_With(self, node: ast.With):
        scoping = any(isinstance(item.context_expr, ast.Call) and ast.unparse(item.context_expr.func) in DEVICE_SCOPES
                      for item in node.items)
        self.scoped += scoping
        self.generic_visit(node)
        self.scoped -= scoping

    def visit_Call(self, node: ast.Call):
        name = ast.unparse(node.func)
        bare = not node.args and not node.keywords
        if not self.scoped and bare and (
                name.startswith("torch.cuda.") and name.removeprefix("torch.cuda.") in DEVICE_DEFAULTING
                or name.endswith(".record")):  # an event recorded on the current device's current stream
            self.found.append((node.lineno, name))
        self.generic_visit(node)


def test_every_cuda_call_names_its_device_or_stream():
    package = Path(promoe_bench.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        finder = Finder()
        finder.visit(ast.parse(path.read_text(), filename=str(path)))
        found += [f"{path.relative_to(package)}:{line} {name}()" for line, name in finder.found]
    assert not found, "CUDA calls on whatever device is current:\n" + "\n".join(found)


def test_the_check_catches_a_call_on_the_current_device():
    finder = Finder()
    finder.visit(ast.parse("import torch\nstream = torch.cuda.current_stream()\nevent.record()\n"
                           "with torch.cuda.device(d):\n    torch.cuda.synchronize()\n"))
    assert finder.found == [(2, "torch.cuda.current_stream"), (3, "event.record")]
