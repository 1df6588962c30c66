"""Triton python-backend model serving a dyvte engine folder (written by ``dyvte triton-repo``).

The engine folder, backend, exit policy and prune spec come from the model config's parameters.
``execute`` hands each batch to the instance's serving worker and returns None; the worker
answers every request through its response sender when its rows finish, so later batches join
the running one at the next decode step (in-flight batching; see ``dyvte.serving.triton``). This
file only converts Triton tensors.
"""

import triton_python_backend_utils as pb_utils

OUTPUTS = ("TEXT", "EXIT_LAYER", "TIMINGS", "DYVTE")
OPTIONAL = ("IMAGE", "MAX_TOKENS", "PRUNE")


def _responder(sender):
    def respond(answer):
        if isinstance(answer, Exception):
            response = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(answer)))
        else:
            response = pb_utils.InferenceResponse([pb_utils.Tensor(n, answer[n]) for n in OUTPUTS])
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    return respond


class TritonPythonModel:
    def initialize(self, args):
        from dyvte.serving.triton import TritonModel

        self.model = TritonModel.from_triton_args(args)

    def execute(self, requests):
        batch = []
        for request in requests:
            arrays = {"PROMPT": pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy()}
            for name in OPTIONAL:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    arrays[name] = tensor.as_numpy()
            batch.append((arrays, _responder(request.get_response_sender()), getattr(request, "is_cancelled", None)))
        self.model.submit(batch)
        return None

    def finalize(self):
        self.model.close()
