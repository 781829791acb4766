// DedupeCommand: `vmm dedupe PATH...`: what would KSM save on these files?
//
// Every regular file under the paths (directories are walked recursively; symbolic links are not
// followed, so nothing is counted twice through a link) is loaded into the memory of one Vmm process:
// one private mapping per file, rounded up to whole pages (the tail of a file's last page stays
// zero), advised MADV_MERGEABLE. KSM then scans on this thread, in chunks, until two full scans in a
// row end with the same counters (the first scan only takes checksums, the second merges, the third
// confirms), and the report says what merging saved: pages_sharing (and ksm_zero_pages with
// --use-zero-pages) x 4 KiB, as a share of the pages loaded, general_profit after KSM's metadata, and
// the host's RSS before and after (the frames merging freed go back to the host).
//
// The machine is sized to the files: one node, its size rounded up to the block size. Paths that do
// not exist or cannot be read, and inputs beyond the size limits, are bad arguments (exit code 2);
// a file found unreadable inside a directory is skipped with a warning.
using System.CommandLine;
using System.Diagnostics;
using Spectre.Console;
using Vmm.Mm;

namespace Vmm.Cli;

/// <summary>The options of `vmm dedupe`.</summary>
/// <param name="Paths">files and directories.</param>
/// <param name="UseZeroPages">KSM's use_zero_pages: zero-filled pages become the zero page.</param>
/// <param name="MaxFileMib">the largest file accepted.</param>
/// <param name="MaxTotalMib">the most that is loaded in all.</param>
/// <param name="BlockSizeMib">the machine's memory block size (the node is a whole number of them).</param>
internal sealed record DedupeOptions(IReadOnlyList<string> Paths, bool UseZeroPages, int MaxFileMib, int MaxTotalMib, int BlockSizeMib);

/// <summary>One input file: its full path and the length it had when it was listed.</summary>
internal sealed record InputFile(string Path, long Length)
{
    public long Pages => (Length + DemoBuffer.PageSize - 1) / DemoBuffer.PageSize;
}

/// <summary>`vmm dedupe`: the command line, and the run.</summary>
internal static class DedupeCommand
{
    private const int ScanChunkPages = 4096;
    private const int MinFullScans = 3;
    private const int MaxFullScans = 10;

    /// <summary>The subcommand; <paramref name="guard"/> turns an ArgumentException into exit code 2.</summary>
    public static Command Build(Func<Func<int>, int> guard)
    {
        var paths = new Argument<string[]>("paths") { Description = "files or directories (recursive)", Arity = ArgumentArity.OneOrMore };
        var useZeroPages = new Option<bool>("--use-zero-pages") { Description = "KSM's use_zero_pages: zero-filled pages become the zero page" };
        var maxFile = new Option<int>("--max-file-mib") { Description = "largest file accepted, MiB (larger ones in directories are skipped)", DefaultValueFactory = _ => 1024 };
        var maxTotal = new Option<int>("--max-total-mib") { Description = "most loaded in all, MiB", DefaultValueFactory = _ => 4096 };
        var blockSize = new Option<int>("--block-size-mib") { Description = "the machine's memory block size, MiB", DefaultValueFactory = _ => 128 };
        var command = new Command("dedupe", "Load files into mergeable memory and report what KSM saves.")
        {
            paths, useZeroPages, maxFile, maxTotal, blockSize,
        };
        command.SetAction(parse => guard(() => Run(
            new DedupeOptions(parse.GetValue(paths) ?? [], parse.GetValue(useZeroPages), parse.GetValue(maxFile), parse.GetValue(maxTotal), parse.GetValue(blockSize)),
            AnsiConsole.Console)));
        return command;
    }

    /// <summary>Collects, loads, scans and reports. Returns the exit code.</summary>
    /// <exception cref="ArgumentException">a bad path or limit (exit code 2).</exception>
    public static int Run(DedupeOptions options, IAnsiConsole console)
    {
        if (options.MaxFileMib < 1 || options.MaxTotalMib < 1 || options.BlockSizeMib < 2)
            throw new ArgumentException("--max-file-mib and --max-total-mib must be at least 1, --block-size-mib at least 2");
        var skipped = new List<string>();
        List<InputFile> files = CollectFiles(options, skipped);
        long pages = files.Sum(f => f.Pages);
        if (pages > (long)options.MaxTotalMib * Units.MiB / DemoBuffer.PageSize)
            throw new ArgumentException($"the files hold {Units.Mib(pages * DemoBuffer.PageSize)}, more than --max-total-mib {options.MaxTotalMib}");

        long rssStart = HostRss();
        using var machine = new Machine(SizeMachine(pages, (long)options.BlockSizeMib * Units.MiB));
        Ksm ksm = machine.Ksm!;
        if (ksm.Write("use_zero_pages", options.UseZeroPages ? "1" : "0") != Errno.None)
            throw new InvalidOperationException("use_zero_pages could not be set");
        VmProcess process = machine.CreateProcess();

        console.Write(new Rule("[bold]vmm dedupe[/]").LeftJustified());
        console.MarkupLineInterpolated(
            $"{files.Count:N0} files, {Units.Mib(pages * DemoBuffer.PageSize)} in pages; machine: 1 node of {Units.Mib(machine.Topology.TotalBytes)}");
        LoadResult load = default;
        ScanResult scan = default;
        long rssLoaded = -1;
        new ProgressRunner(console).Run(
            ("loading", files.Sum(f => f.Length), progress =>
            {
                load = LoadFiles(process, files, skipped, progress);
                rssLoaded = HostRss();
            }),
            ("scanning", pages * MinFullScans, progress => scan = ScanUntilStable(ksm, load.Pages, progress)));
        ReportSkipped(console, skipped);
        ksm.WaitForMemoryRelease(); // the freed frames go back to the host in the background
        Report(console, options, load, scan, ksm.GetStats(), (rssStart, rssLoaded, HostRss()));
        IReadOnlyList<string> problems = machine.Audit();
        if (problems.Count > 0)
        {
            console.MarkupLineInterpolated($"[red]Audit: {problems.Count} problems[/]: {string.Join("; ", problems.Take(5))}");
            return 1;
        }
        process.Exit();
        return 0;
    }

    private static long HostRss() => Native.HostMemory.ReadRssBytes();

    // ---- collecting the files ------------------------------------------------------------------------

    /// <summary>Every regular, non-empty file under the paths, once each, in a stable order.</summary>
    private static List<InputFile> CollectFiles(DedupeOptions options, List<string> skipped)
    {
        long maxFile = (long)options.MaxFileMib * Units.MiB;
        var seen = new HashSet<string>(StringComparer.Ordinal);
        var files = new List<InputFile>();
        foreach (string path in options.Paths)
        {
            string full = Path.GetFullPath(path);
            if (File.Exists(full))
                AddExplicitFile(full, maxFile, seen, files);
            else if (Directory.Exists(full))
                AddDirectory(full, maxFile, seen, files, skipped);
            else
                throw new ArgumentException($"no such file or directory: {path}");
        }
        if (files.Count == 0)
            throw new ArgumentException("no readable, non-empty files under the paths given");
        return files;
    }

    private static void AddExplicitFile(string path, long maxFile, HashSet<string> seen, List<InputFile> files)
    {
        var info = new FileInfo(path);
        if (info.Length > maxFile)
            throw new ArgumentException($"{path} is {Units.Mib(info.Length)}, larger than --max-file-mib {maxFile / Units.MiB}");
        try
        {
            using FileStream _ = info.OpenRead();
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ArgumentException($"cannot read {path}: {e.Message}");
        }
        if (info.Length > 0 && seen.Add(path))
            files.Add(new InputFile(path, info.Length));
    }

    private static void AddDirectory(string directory, long maxFile, HashSet<string> seen, List<InputFile> files, List<string> skipped)
    {
        var walk = new EnumerationOptions
        {
            RecurseSubdirectories = true,
            IgnoreInaccessible = true,                 // unreadable subdirectories are left out
            AttributesToSkip = FileAttributes.ReparsePoint, // symbolic links: no loops, no double counting
        };
        foreach (FileInfo info in new DirectoryInfo(directory).EnumerateFiles("*", walk).OrderBy(f => f.FullName, StringComparer.Ordinal))
        {
            // Length 0: empty files, and the special files (FIFOs, devices) whose open could block.
            if (info.Length == 0 || !seen.Add(info.FullName))
                continue;
            if (info.Length > maxFile)
                skipped.Add($"{info.FullName}: {Units.Mib(info.Length)}, larger than --max-file-mib");
            else
                files.Add(new InputFile(info.FullName, info.Length));
        }
    }

    private static void ReportSkipped(IAnsiConsole console, List<string> skipped)
    {
        foreach (string line in skipped.Take(5))
            console.MarkupLineInterpolated($"[yellow]skipped[/] {line}");
        if (skipped.Count > 5)
            console.MarkupLineInterpolated($"[yellow]skipped[/] {skipped.Count - 5:N0} more");
    }

    // ---- sizing the machine ----------------------------------------------------------------------

    /// <summary>
    /// One node that holds the pages with room for page tables (one frame per 512 pages, plus the
    /// upper levels), the watermark reserve and some slack: 1/32 more and 32 MiB, in whole blocks.
    /// </summary>
    private static MachineOptions SizeMachine(long pages, long blockBytes)
    {
        long bytes = pages * DemoBuffer.PageSize;
        long wanted = bytes + bytes / 32 + 32 * Units.MiB;
        long node = (wanted + blockBytes - 1) / blockBytes * blockBytes;
        return new MachineOptions { NodeCount = 1, NodeSizeBytes = node, BlockSizeBytes = blockBytes };
    }

    // ---- loading -----------------------------------------------------------------------------------

    private readonly record struct LoadResult(int Files, long Bytes, long Pages);

    private static LoadResult LoadFiles(VmProcess process, List<InputFile> files, List<string> skipped, IProgressSink progress)
    {
        byte[] chunk = new byte[1 << 20];
        int loaded = 0;
        long bytes = 0, pages = 0;
        foreach (InputFile file in files)
        {
            long done = TryLoadFile(process, file, chunk, skipped);
            if (done >= 0)
            {
                loaded++;
                bytes += done;
                pages += file.Pages;
            }
            progress.Advance(file.Length);
        }
        return new LoadResult(loaded, bytes, pages);
    }

    /// <summary>One file into a fresh mergeable mapping; the bytes read, or -1 (skipped) if it cannot be read.</summary>
    private static long TryLoadFile(VmProcess process, InputFile file, byte[] chunk, List<string> skipped)
    {
        FileStream stream;
        try
        {
            stream = new FileStream(file.Path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite, 1, FileOptions.SequentialScan);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            skipped.Add($"{file.Path}: {e.Message}");
            return -1;
        }
        using (stream)
        {
            ulong length = (ulong)file.Pages * DemoBuffer.PageSize;
            ulong va = process.Mmap(length);
            if (process.Madvise(va, length, Advice.Mergeable) != Errno.None)
                throw new InvalidOperationException($"madvise(MERGEABLE) failed for {file.Path}");
            // Read at most the listed length: a file that grew meanwhile is cut there, one that shrank
            // leaves zeros behind.
            long done = 0;
            try
            {
                int read;
                while (done < file.Length && (read = stream.Read(chunk, 0, (int)Math.Min(chunk.Length, file.Length - done))) > 0)
                {
                    process.Write(va + (ulong)done, chunk.AsSpan(0, read));
                    done += read;
                }
            }
            catch (IOException e)
            {
                skipped.Add($"{file.Path}: read {done:N0} bytes, then {e.Message}");
            }
            return done;
        }
    }

    // ---- scanning ----------------------------------------------------------------------------------

    private readonly record struct ScanResult(long FullScans, TimeSpan Elapsed, bool Stable);

    /// <summary>
    /// Scans in chunks until the merge counters are the same at the end of two full scans in a row (at
    /// least three scans, at most ten). Progress is counted in pages visited, a full scan being
    /// <paramref name="pages"/>; the total grows by a scan whenever one more is needed.
    /// </summary>
    private static ScanResult ScanUntilStable(Ksm ksm, long pages, IProgressSink progress)
    {
        var clock = Stopwatch.StartNew();
        KsmStats start = ksm.GetStats();
        long scans = 0, visitedThisScan = 0;
        (long, long, long) last = (-1, -1, -1);
        while (scans < MaxFullScans)
        {
            KsmStats before = ksm.GetStats();
            int examined = ksm.ScanPages(ScanChunkPages);
            KsmStats after = ksm.GetStats();
            long visited = examined + after.PagesSkipped - before.PagesSkipped;
            if (after.FullScans == before.FullScans)
            {
                if (visited == 0)
                    break; // nothing registered (cannot happen with files loaded, but never spin)
                long step = Math.Min(visited, Math.Max(0, pages - visitedThisScan));
                visitedThisScan += visited;
                progress.Advance(step);
                continue;
            }
            // A full scan ended inside this chunk.
            progress.Advance(Math.Max(0, pages - visitedThisScan));
            visitedThisScan = 0;
            scans = after.FullScans - start.FullScans;
            (long, long, long) counters = (after.PagesShared, after.PagesSharing, after.KsmZeroPages);
            if (scans >= MinFullScans && counters == last)
                return new ScanResult(scans, clock.Elapsed, Stable: true);
            last = counters;
            if (scans >= MinFullScans)
                progress.Grow(pages);
        }
        return new ScanResult(scans, clock.Elapsed, Stable: false);
    }

    // ---- the report ----------------------------------------------------------------------------------

    private static void Report(IAnsiConsole console, DedupeOptions options, LoadResult load, ScanResult scan, KsmStats k,
        (long Start, long Loaded, long Merged) rss)
    {
        long savedPages = k.PagesSharing + (options.UseZeroPages ? k.KsmZeroPages : 0);
        long savedBytes = savedPages * DemoBuffer.PageSize;
        long loadedPageBytes = load.Pages * DemoBuffer.PageSize;
        var table = new Table().AddColumns("", "value", "");
        table.Columns[1].RightAligned();
        table.AddRow("files", load.Files.ToString("N0"), "");
        table.AddRow("bytes loaded", load.Bytes.ToString("N0"), Units.Mib(load.Bytes));
        table.AddRow("pages", load.Pages.ToString("N0"), $"{Units.Mib(loadedPageBytes)} with the tails of last pages");
        table.AddRow("full scans", scan.FullScans.ToString("N0"), $"{scan.Elapsed.TotalSeconds:F1} s{(scan.Stable ? "" : ", [yellow]not yet stable[/]")}");
        table.AddRow("pages_shared", k.PagesShared.ToString("N0"), "KSM pages (one copy of each duplicated content)");
        table.AddRow("pages_sharing", k.PagesSharing.ToString("N0"), "further mappings of them");
        if (options.UseZeroPages)
            table.AddRow("ksm_zero_pages", k.KsmZeroPages.ToString("N0"), "zero-filled pages now mapping the zero page");
        table.AddRow("pages_unshared", k.PagesUnshared.ToString("N0"), "unique pages");
        table.AddRow("[bold]saved[/]", $"[green]{savedBytes:N0}[/]", $"[green]{Units.Mib(savedBytes)}, {(double)savedBytes / Math.Max(1, loadedPageBytes):P1} of the pages[/]");
        table.AddRow("general_profit", k.GeneralProfit.ToString("N0"), $"{Units.Mib(k.GeneralProfit)} after {k.RmapItems:N0} rmap items of {Ksm.RmapItemBytes} B");
        table.AddRow("host RSS", Units.Rss(rss.Merged), $"after merging; {Units.Rss(rss.Loaded)} after loading, {Units.Rss(rss.Start)} before");
        console.Write(table);
    }
}
