// C++ name demangling for the tools, through libstdc++'s __cxa_demangle (libiberty's
// cplus_demangle is not installed by default on Debian; libstdc++ always is).
#include <cstdlib>
#include <cstring>
#include <cxxabi.h>

extern "C" char *tc_demangle(const char *mangled)
{
    if (!mangled || std::strncmp(mangled, "_Z", 2) != 0)
        return nullptr;
    int status = 0;
    char *out = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
    if (status != 0) {
        std::free(out);
        return nullptr;
    }
    return out;
}
