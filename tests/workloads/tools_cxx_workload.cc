// C++ workload for the symbolisation test: allocation sites inside namespaces, classes and
// templates (names must come out demangled), reached through operator new.
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

namespace lumtest {
template <typename T> struct Pool {
    __attribute__((noinline)) static std::vector<T *> fill(std::size_t n)
    {
        std::vector<T *> v;
        for (std::size_t i = 0; i < n; i++)
            v.push_back(new T[512]);
        return v;
    }
};

struct Widget {
    __attribute__((noinline)) static void churn(std::size_t rounds)
    {
        for (std::size_t r = 0; r < rounds; r++) {
            auto v = Pool<double>::fill(64);
            for (double *p : v)
                delete[] p;
        }
    }
};
} // namespace lumtest

int main(int argc, char **argv)
{
    std::size_t rounds = argc > 1 ? std::strtoul(argv[1], nullptr, 0) : 2000;
    lumtest::Widget::churn(rounds);
    std::puts("done");
    return 0;
}
