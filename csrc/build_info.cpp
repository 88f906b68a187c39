// The Python module dspark_ext._C: loading it registers the ops; its only Python surface
// is build information. Ops are reached through torch.ops.dspark.*, never from here.
#include <torch/extension.h>

#ifndef DSPARK_CUDA_ARCHS
#define DSPARK_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", [] {
    pybind11::dict info;
    info["torch_version"] = TORCH_VERSION;
    info["cuda_archs"] = DSPARK_CUDA_ARCHS;
#ifdef DSPARK_WITH_CUDA
    info["with_cuda"] = true;
#else
    info["with_cuda"] = false;
#endif
    return info;
  });
}
