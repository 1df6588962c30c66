"""Triton python-backend model serving a dyvte engine folder (written by ``dyvte triton-repo``).

The engine folder, backend and exit policy come from the model config's parameters. Each batch
Triton's dynamic batcher forms runs as ONE ``Pipeline.run`` call, in which every sample exits
on its own (see ``dyvte.triton_repo.TritonModel``); this file only converts Triton tensors.
"""

import triton_python_backend_utils as pb_utils

OUTPUTS = ("TEXT", "EXIT_LAYER", "TIMINGS", "DYVTE")
OPTIONAL = ("IMAGE", "MAX_TOKENS")


class TritonPythonModel:
    def initialize(self, args):
        from dyvte.triton_repo import TritonModel

        self.model = TritonModel.from_triton_args(args)

    def execute(self, requests):
        inputs = []
        for request in requests:
            arrays = {"PROMPT": pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy()}
            for name in OPTIONAL:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    arrays[name] = tensor.as_numpy()
            inputs.append(arrays)
        responses = []
        for answer in self.model.execute(inputs):
            if isinstance(answer, Exception):
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(answer))))
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, answer[n]) for n in OUTPUTS]))
        return responses

    def finalize(self):
        self.model.close()
