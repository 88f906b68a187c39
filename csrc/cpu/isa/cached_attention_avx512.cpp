#include "../cached_attention_kernel.h"
