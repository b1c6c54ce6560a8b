"""The program that runs a deployed function inside its sandbox.

The Engine starts it as ``python3 -I -c SOURCE HANDLER`` with this file's
text as SOURCE, so it needs only the standard library of the sandbox's
python3 (3.8 or newer) and never imports the engine.

Protocol, over the process's stdin and stdout: each frame is a 4-byte
big-endian length and that many bytes. The first input frame is the package
(a tar.gz), which is unpacked into /app before the handler's module is
imported once. The runner then sends one JSON frame, {"ready": true} or an
error, and serves calls: each input frame is a JSON object {"kwargs": {...},
"outputs": DIR or null}, and each output frame is {"ok": true, "result": ...,
"outputs": [{"name", "size"}]} or {"ok": false, "type": ..., "message": ...,
"traceback": ...}. The function may write files below the outputs directory,
which the environment variable ENGINE_OUTPUTS_DIR names during a call, or
save them with ``engine_output.Output``.

Before the import, file descriptor 1 is moved to a private descriptor and fd 1
is pointed at stderr, so that the function's prints never corrupt the frames.
"""

import importlib
import io
import json
import os
import shutil
import struct
import sys
import tarfile
import traceback
import types

APP_DIRECTORY = "/app"
# Largest encoded result, in bytes; a larger one is reported as an error,
# because the engine keeps at most 8 MiB of a process's stdout.
MAX_RESULT_BYTES = 4 * 1024 * 1024
HEADER = struct.Struct(">I")


def read_exactly(stream, count):
    data = bytearray()
    while len(data) < count:
        chunk = stream.read(count - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def read_frame(stream):
    header = read_exactly(stream, HEADER.size)
    if header is None:
        return None
    return read_exactly(stream, HEADER.unpack(header)[0])


def write_frame(stream, message):
    data = json.dumps(message).encode()
    if len(data) > MAX_RESULT_BYTES:
        data = json.dumps(
            {
                "ok": False,
                "type": "ValueError",
                "message": f"the result is {len(data)} bytes of JSON, over the"
                f" limit of {MAX_RESULT_BYTES}",
                "traceback": "",
            }
        ).encode()
    stream.write(HEADER.pack(len(data)) + data)
    stream.flush()


def error_frame(error, **extra):
    frame = {
        "ok": False,
        "type": type(error).__name__,
        "message": str(error),
        "traceback": traceback.format_exc(),
    }
    frame.update(extra)
    return frame


def unpack(package):
    os.makedirs(APP_DIRECTORY, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(package), mode="r:gz") as archive:
        # The engine has checked every member: regular files and
        # directories with relative paths inside the package.
        if hasattr(tarfile, "data_filter"):
            archive.extractall(APP_DIRECTORY, filter="data")
        else:
            archive.extractall(APP_DIRECTORY)


def reset_outputs(directory):
    if not directory:
        os.environ.pop("ENGINE_OUTPUTS_DIR", None)
        return
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    os.environ["ENGINE_OUTPUTS_DIR"] = directory


def list_outputs(directory):
    """Return [{"name", "size"}] for the regular files below ``directory``."""
    found = []
    if not directory:
        return found
    for parent, _, names in os.walk(directory):
        for name in sorted(names):
            path = os.path.join(parent, name)
            if os.path.isfile(path) and not os.path.islink(path):
                relative = os.path.relpath(path, directory)
                found.append({"name": relative, "size": os.path.getsize(path)})
    return found


class Output:
    """A file to keep as an output of the current task, as Beam's ``Output``.

    ``Output(path="chart.png").save()`` copies the file into the outputs
    directory under its base name. Import it with ``from engine_output import
    Output`` inside a deployed function.
    """

    def __init__(self, path):
        self.path = path

    def save(self):
        directory = os.environ.get("ENGINE_OUTPUTS_DIR")
        if not directory:
            raise RuntimeError(
                "no outputs directory: outputs are kept only for task queue calls"
            )
        shutil.copyfile(self.path, os.path.join(directory, os.path.basename(self.path)))
        return self


def install_output_module():
    module = types.ModuleType("engine_output")
    module.Output = Output
    sys.modules["engine_output"] = module


def install_sdk_shim():
    """Let ``from engine.sdk.deploy import endpoint`` work without the engine.

    Deployed modules use the SDK's decorators, but the sandbox's python3
    does not have the engine installed. The shim's decorators return the
    function unchanged.
    """
    try:
        importlib.import_module("engine.sdk.deploy")
        return
    except ImportError:
        pass

    def decorator(**settings):
        def wrap(function):
            return function

        return wrap

    names = ("engine", "engine.sdk", "engine.sdk.deploy")
    modules = [types.ModuleType(name) for name in names]
    modules[0].sdk = modules[1]
    modules[1].deploy = modules[2]
    modules[2].endpoint = decorator
    modules[2].task_queue = decorator
    for module in modules:
        sys.modules[module.__name__] = module


def main():
    handler = sys.argv[1]
    frames_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    frames_in = sys.stdin.buffer

    package = read_frame(frames_in)
    if package is None:
        return
    module_name, _, function_name = handler.partition(":")
    try:
        unpack(package)
        install_output_module()
        install_sdk_shim()
        os.chdir(APP_DIRECTORY)
        sys.path.insert(0, APP_DIRECTORY)
        module = importlib.import_module(module_name)
        function = getattr(module, function_name)
        # A decorated function deploys as the object the decorator returned;
        # call the function it wraps.
        function = getattr(function, "function", function)
        if not callable(function):
            raise TypeError(f"{handler} is not callable")
    except BaseException as error:
        write_frame(frames_out, error_frame(error, ready=False))
        return
    write_frame(frames_out, {"ready": True})

    while True:
        frame = read_frame(frames_in)
        if frame is None:
            return
        request = json.loads(frame)
        try:
            reset_outputs(request.get("outputs"))
            result = function(**request["kwargs"])
            response = {"ok": True, "result": result}
            json.dumps(response)
            response["outputs"] = list_outputs(request.get("outputs"))
        except Exception as error:
            response = error_frame(error)
        write_frame(frames_out, response)


if __name__ == "__main__":
    main()
