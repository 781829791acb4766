using System.Globalization;

namespace Vmm.Native;

/// <summary>What the host operating system says about this process's memory.</summary>
internal static class HostMemory
{
    /// <summary>
    /// Resident set size in bytes (VmRSS of /proc/self/status), or -1 where the host does not say.
    /// </summary>
    public static long ReadRssBytes() => ReadStatusKib("VmRSS:");

    /// <summary>Resident anonymous memory in bytes (RssAnon of /proc/self/status), or -1.</summary>
    public static long ReadRssAnonBytes() => ReadStatusKib("RssAnon:");

    private static long ReadStatusKib(string key)
    {
        const string path = "/proc/self/status";
        if (!File.Exists(path))
            return -1;
        foreach (string line in File.ReadLines(path))
        {
            if (!line.StartsWith(key, StringComparison.Ordinal))
                continue;
            // "VmRSS:     12345 kB"
            string[] parts = line[key.Length..].Split([' ', '\t'], StringSplitOptions.RemoveEmptyEntries);
            return long.Parse(parts[0], CultureInfo.InvariantCulture) * 1024;
        }
        return -1;
    }
}
