#include "../skinny_linear_kernel.h"
