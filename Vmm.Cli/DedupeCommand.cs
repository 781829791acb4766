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
// Input is checked before it is opened (FileKinds): a FIFO, a device or a socket is skipped with a
// warning and never opened (opening a FIFO blocks, /dev/zero never ends), whether it is named on the
// command line or met in a directory. A path that cannot be used (missing, unreadable, not a regular
// file or directory, too large) is reported and the others are still processed; if it was named on
// the command line the exit code is then 2 (as grep or du say that an operand failed), while what is
// skipped inside a directory only warns. Nothing readable at all, or more than --max-total-mib, is
// exit code 2 before any machine is built.
//
// The machine is sized to the files: one node, its size rounded up to the block size.
using System.CommandLine;
using System.Diagnostics;
using Spectre.Console;

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

    /// <summary>The subcommand; <paramref name="guard"/> maps exceptions to exit codes (Program.Guard).</summary>
    public static Command Build(Func<Func<int>, int> guard, IAnsiConsole console)
    {
        var paths = new Argument<string[]>("paths") { Description = "files or directories (recursive); -- before a path that starts with '-'", Arity = ArgumentArity.OneOrMore };
        var useZeroPages = new Option<bool>("--use-zero-pages") { Description = "KSM's use_zero_pages: zero-filled pages become the zero page" };
        Option<int> maxFile = Usage.IntOption("--max-file-mib", "largest file accepted, MiB (larger ones are skipped)", 1024, 1, 1 << 20);
        Option<int> maxTotal = Usage.IntOption("--max-total-mib", "most loaded in all, MiB", 4096, 1, 1 << 24);
        Option<int> blockSize = Usage.BlockSizeOption("the machine's memory block size, MiB");
        var command = new Command("dedupe", "Load files into mergeable memory and report what KSM saves.")
        {
            paths, useZeroPages, maxFile, maxTotal, blockSize,
        };
        command.SetAction(parse => guard(() => Run(
            new DedupeOptions(parse.GetValue(paths) ?? [], parse.GetValue(useZeroPages), parse.GetValue(maxFile), parse.GetValue(maxTotal), parse.GetValue(blockSize)),
            console)));
        return command;
    }

    /// <summary>
    /// Collects, loads, scans and reports. Returns the exit code: 1 if the Audit found a problem, else 2
    /// if a path named on the command line could not be used (the rest was processed), else 0.
    /// </summary>
    /// <exception cref="UsageException">nothing readable, or more than --max-total-mib (exit code 2).</exception>
    public static int Run(DedupeOptions options, IAnsiConsole console)
    {
        var skipped = new List<string>();
        int badPaths = 0;
        List<InputFile> files = CollectFiles(options, skipped, problem =>
        {
            badPaths++;
            console.MarkupLineInterpolated($"[red]cannot use[/] {problem}");
        });
        if (files.Count == 0)
        {
            ReportSkipped(console, skipped);
            throw new UsageException("no readable, non-empty regular files under the paths given");
        }
        long pages = files.Sum(f => f.Pages);
        if (pages > (long)options.MaxTotalMib * Units.MiB / DemoBuffer.PageSize)
            throw new UsageException($"the files hold {Units.Mib(pages * DemoBuffer.PageSize)}, more than --max-total-mib {options.MaxTotalMib}");

        long rssStart = HostRss();
        using Machine machine = Usage.CreateMachine(SizeMachine(pages, (long)options.BlockSizeMib * Units.MiB));
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
            return ExitCodes.AuditProblem;
        }
        process.Exit();
        if (badPaths > 0)
        {
            console.MarkupLineInterpolated($"[red]{badPaths} of the paths named could not be used[/] (exit code {ExitCodes.BadArguments}); the rest is above.");
            return ExitCodes.BadArguments;
        }
        return ExitCodes.Success;
    }

    // The host's RSS, also before the machine exists (MachineStats.HostRssBytes needs one): the BCL's
    // reading of the same kernel counter (VmRSS) on Linux. It reads 0 where that cannot be read, which
    // would print "0 MiB"; -1 prints "n/a", as MachineStats.HostRssBytes does.
    private static long HostRss() => Environment.WorkingSet is > 0 and long rss ? rss : -1;

    // ---- collecting the files ------------------------------------------------------------------------

    /// <summary>
    /// Every regular, non-empty file under the paths, once each, in a stable order. A named path that
    /// cannot be used goes to <paramref name="badPath"/>; what is skipped inside a directory (special
    /// files, unreadable subdirectories, files too large) to <paramref name="skipped"/>.
    /// </summary>
    private static List<InputFile> CollectFiles(DedupeOptions options, List<string> skipped, Action<string> badPath)
    {
        long maxFile = (long)options.MaxFileMib * Units.MiB;
        var seen = new HashSet<string>(StringComparer.Ordinal);
        var files = new List<InputFile>();
        foreach (string path in options.Paths)
        {
            if (path.Length == 0)
            {
                badPath("\"\": an empty path");
                continue;
            }
            string full = Path.GetFullPath(path);
            FileStatus status = FileKinds.Stat(full, followLinks: true); // a link named on the command line is followed
            if (status.Error is { } error)
                badPath($"{path}: {error}");
            else if (status.Kind == FileKind.Directory)
                AddDirectory(full, maxFile, seen, files, skipped, badPath);
            else if (status.Kind != FileKind.Regular)
                badPath($"{path}: {status.KindName}, skipped (only regular files and directories are read)");
            else if (status.Length > maxFile)
                badPath($"{path}: {Units.Mib(status.Length)}, larger than --max-file-mib {options.MaxFileMib}");
            else if (status.Length == 0)
                skipped.Add($"{path}: empty");
            else if (seen.Add(full))
                files.Add(new InputFile(full, status.Length));
        }
        return files;
    }

    /// <summary>
    /// The regular files under <paramref name="root"/>, walked depth first in ordinal order. Symbolic
    /// links are not followed (no loops, no double counting) and are left out silently; every other
    /// entry that is not a regular file or a directory, and every directory that cannot be listed, is
    /// skipped with a warning (the root itself, named on the command line, goes to <paramref name="badPath"/>).
    /// </summary>
    private static void AddDirectory(string root, long maxFile, HashSet<string> seen, List<InputFile> files, List<string> skipped, Action<string> badPath)
    {
        var pending = new Stack<string>();
        pending.Push(root);
        var list = new EnumerationOptions { RecurseSubdirectories = false, IgnoreInaccessible = false, AttributesToSkip = 0 };
        while (pending.TryPop(out string? directory))
        {
            List<string> entries;
            try
            {
                entries = [.. Directory.EnumerateFileSystemEntries(directory, "*", list)];
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                string problem = $"{directory}: cannot list: {e.Message}";
                if (directory == root)
                    badPath(problem); // named on the command line
                else
                    skipped.Add(problem);
                continue;
            }
            entries.Sort(StringComparer.Ordinal);
            var subdirectories = new List<string>();
            foreach (string entry in entries)
            {
                FileStatus status = FileKinds.Stat(entry, followLinks: false);
                if (status.Error is { } error)
                    skipped.Add($"{entry}: {error}");
                else if (status.Kind == FileKind.Directory)
                    subdirectories.Add(entry);
                else if (status.Kind == FileKind.SymbolicLink)
                    continue;
                else if (status.Kind != FileKind.Regular)
                    skipped.Add($"{entry}: {status.KindName}");
                else if (status.Length > maxFile)
                    skipped.Add($"{entry}: {Units.Mib(status.Length)}, larger than --max-file-mib");
                else if (status.Length > 0 && seen.Add(entry))
                    files.Add(new InputFile(entry, status.Length));
            }
            for (int i = subdirectories.Count - 1; i >= 0; i--)
                pending.Push(subdirectories[i]); // popped in ordinal order
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
        // Never blocks: a path that became a FIFO or a device since it was listed is refused here.
        using Microsoft.Win32.SafeHandles.SafeFileHandle? handle = FileKinds.OpenRegular(file.Path, out string? error);
        if (handle is null)
        {
            skipped.Add($"{file.Path}: {error}");
            return -1;
        }
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
            while (done < file.Length && (read = RandomAccess.Read(handle, chunk.AsSpan(0, (int)Math.Min(chunk.Length, file.Length - done)), done)) > 0)
            {
                process.Write(va + (ulong)done, chunk.AsSpan(0, read));
                done += read;
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            skipped.Add($"{file.Path}: read {done:N0} bytes, then {e.Message}");
        }
        return done;
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
