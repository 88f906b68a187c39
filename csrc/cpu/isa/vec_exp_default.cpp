#include "../vec_exp_array.h"
