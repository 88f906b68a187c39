// Lets the framework-free numerics compile unchanged for the host (CPU kernels, tests)
// and for the device (CUDA kernels).
#pragma once

#if defined(__CUDACC__)
#define DSPARK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DSPARK_HOST_DEVICE inline
#endif
