using System.Globalization;

namespace Vmm.Tests;

/// <summary>Knobs that make the bounded stress and model tests run longer: VMM_STRESS_SCALE=N multiplies iterations.</summary>
internal static class TestEnvironment
{
    /// <summary>Iteration multiplier from VMM_STRESS_SCALE (default 1).</summary>
    public static int StressScale { get; } =
        int.TryParse(Environment.GetEnvironmentVariable("VMM_STRESS_SCALE"), NumberStyles.Integer, CultureInfo.InvariantCulture, out int scale) && scale > 0 ? scale : 1;

    /// <summary>Seed for the seeded tests from VMM_SEED (default: the test's own).</summary>
    public static int Seed(int defaultSeed) =>
        int.TryParse(Environment.GetEnvironmentVariable("VMM_SEED"), NumberStyles.Integer, CultureInfo.InvariantCulture, out int seed) ? seed : defaultSeed;
}
