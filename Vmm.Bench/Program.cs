// Vmm.Bench: BenchmarkDotNet microbenchmarks and macro scenarios.
//
//   dotnet run -c Release --project Vmm.Bench -- --filter '*PageOps*'     (BenchmarkDotNet)
//   dotnet run -c Release --project Vmm.Bench -- scenario pageops          (one JSON line last)
//
// A scenario prints human-readable progress first and, as its very last line, one JSON object of
// results so that scripts can read it with `tail -n 1`.
using BenchmarkDotNet.Running;
using Vmm.Bench.Scenarios;

namespace Vmm.Bench;

internal static class Program
{
    private static int Main(string[] args)
    {
        if (args.Length > 0 && args[0] == "scenario")
            return ScenarioRunner.Run(args.AsSpan(1).ToArray());

        BenchmarkSwitcher.FromAssembly(typeof(Program).Assembly).Run(args);
        return 0;
    }
}
